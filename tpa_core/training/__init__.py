"""Training TPA models: next-token pretraining of `TPAModel` in every attention form, and MLA as a baseline.

Modules: `data` (the byte-level corpus and its batches), `variants` (attention variants at matched parameter
counts), `lm` (the differentiable forward), `trainer` (AdamW, schedule, evaluation, checkpoints), `mla`
(multi-head latent attention, comparison only), `export` (a trained model as an official T6 checkpoint folder).
"""
