"""The training pipeline of the shipped models: a workspace package of its own, never in the image (no
running service imports it, and its LightGBM / scikit-learn dependencies stay out of the scoring wheel).

    .venv/bin/python -m cdp_training      # make models; --seed, --population, --holdout, --out

simulates two customer populations (seed 7: 16,000 people to train on; seed 8: 8,000 to measure on),
applies each person's events to a `cdp_profile.domain.Profile` with the models' computed-trait definitions
(so features are what production computes), assembles rows with `cdp_scoring.domain.FeatureAssembler`,
trains the models, and writes `cdp_scoring/models/<model>.onnx` (each carrying its `ModelSpec`: where
the scoring service loads them, `pipeline.MODELS_DIR`) and
`report.json` (quality figures, the floors they must meet, scores, computed traits). Same seed, same files.

- `simulator`: the population (latent traits -> events as Segment JSON and as ProfileEvents; outcomes)
- `traits`: the computed traits the models read and each model's features
- `dataset`: profile pass and feature rows
- `bgnbd`: BG/NBD and Gamma-Gamma (likelihoods, fits, reference formulas, samplers)
- `graphs`: hand-built ONNX graphs (CLV, isolation forest) and the spec in the metadata
- `models`: one builder per model; `metrics`: AUC, calibration, precision at recall
- `pipeline`: the whole run and the report

The learning loop (models trained on the platform's own customers, from the profile store):

- `labels`: what a model predicts, as data (`training.label` in its spec)
- `pointintime`: training sets at a cut-off T from the profile store (features as known at T, labels after)
- `platformdata`: a profile store written the way the profile service writes it (benchmarks, tests, trials)

See the package README (libs/cdp-training/README.md) for the simulator, the features and the figures.
"""
