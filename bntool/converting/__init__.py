"""Converting BatchNorm layers between ``nn.BatchNorm*`` and ``nn.SyncBatchNorm``, both ways, verified."""
