"""DPO training wiring: the LightningModule, the DataModule, the precompute pass and the train stage."""
