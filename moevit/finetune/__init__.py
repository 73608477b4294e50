"""Downstream fine-tuning of pruned (or full) models on a new classification task: `moevit finetune`."""
