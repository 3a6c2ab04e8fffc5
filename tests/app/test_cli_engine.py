"""`tpa-rag generate`, `chat`, `models fetch|list` on a tiny GGUF model, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tpa_core"))

from engine_fixtures import write_tiny_gguf

from app.cli import main

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-model") / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-data")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys, data, tiny_gguf):
    code, out, err = run(capsys, "--data-dir", str(data), "--model", str(tiny_gguf), "generate", "--raw", "--json",
                         "--max-new-tokens", "7", "the wall is")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"text", "token_ids", "prompt_tokens", "metrics"}
    assert 1 <= len(result["token_ids"]) <= 7
    assert result["prompt_tokens"] > 0
    assert set(result["metrics"]) == {"prefill_ms", "ttft_ms", "decode_tokens_per_s"}
    assert result["metrics"]["ttft_ms"] >= result["metrics"]["prefill_ms"] > 0


def test_generate_streams_text_and_seeded_sampling_repeats(capsys, data, tiny_gguf):
    argv = ["--data-dir", str(data), "--model", str(tiny_gguf), "generate", "--temperature", "0.9", "--top-p",
            "0.9", "--top-k", "50", "--seed", "3", "--max-new-tokens", "12", "hello there"]
    code, first, err = run(capsys, *argv)
    assert code == 0, err
    code, second, _ = run(capsys, *argv)
    assert code == 0 and first == second and first.endswith("\n")
    code, greedy, _ = run(capsys, "--data-dir", str(data), "--model", str(tiny_gguf), "generate", "--json",
                          "--max-new-tokens", "12", "--dtype", "bfloat16", "hello there")
    assert code == 0 and json.loads(greedy)["prompt_tokens"] > 12  # the chat template wrapped the prompt


def test_prompt_longer_than_the_context_window(capsys, data, tiny_gguf):
    code, out, err = run(capsys, "--data-dir", str(data), "--model", str(tiny_gguf), "generate", "--raw",
                         "the wall " * 40)
    assert code == 2
    assert "context window is 64 tokens" in err and out == ""


@pytest.mark.parametrize("model, message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("./missing/model.gguf", "model path not found"),
])
def test_bad_model_names(capsys, data, model, message):
    code, _, err = run(capsys, "--data-dir", str(data), "--model", model, "generate", "hi")
    assert code == 2 and message in err


def test_corrupt_and_unsupported_models(capsys, data, tmp_path, tiny_gguf):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:3000])
    code, _, err = run(capsys, "--data-dir", str(data), "--model", str(broken), "generate", "hi")
    assert code == 2 and "GGUF" in err
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    code, _, err = run(capsys, "--data-dir", str(data), "--model", str(folder), "generate", "hi")
    assert code == 2 and "unsupported architecture" in err


def test_models_fetch_and_list(capsys, data, tiny_gguf):
    code, out, err = run(capsys, "--data-dir", str(data), "models", "fetch", str(tiny_gguf))
    assert code == 0 and "fingerprint" in out, err
    fingerprint = out.split("fingerprint ")[1].split()[0]
    code, out, _ = run(capsys, "--data-dir", str(data), "models", "list", "--json")
    listing = json.loads(out)
    assert [k["name"] for k in listing["known"]] == ["smollm2-135m-instruct"]
    assert fingerprint in [c["fingerprint"] for c in listing["cached"]]
    code, out, _ = run(capsys, "--data-dir", str(data), "models", "list")
    assert code == 0 and "smollm2-135m-instruct" in out and fingerprint[:12] in out
    code, _, err = run(capsys, "--data-dir", str(data), "models", "fetch", "no-such-model")
    assert code == 2 and "unknown model" in err


def _cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *argv], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_chat_reads_turns_from_a_pipe(data, tiny_gguf):
    done = _cli("--data-dir", str(data), "--model", str(tiny_gguf), "chat", "--max-new-tokens", "6", "--threads", "1",
                stdin="hello\n\nthe wall\n/reset\nagain\n/exit\nnot read\n")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) >= 3  # one reply per turn (a reply may hold newlines)
    assert "Traceback" not in done.stderr


def test_user_errors_have_no_traceback(data):
    done = _cli("--data-dir", str(data), "--model", "no-such-model", "generate", "hi")
    assert done.returncode == 2
    assert "unknown model 'no-such-model'" in done.stderr and "Traceback" not in done.stderr
