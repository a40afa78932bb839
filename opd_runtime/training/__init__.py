"""Pieces shared by the training stages (SFT and the OPD learner): batching, optimizers, checkpoints."""
