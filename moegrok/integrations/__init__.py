"""Integrations: the monitor inside training loops moegrok does not run — a plain PyTorch loop
(`moegrok.integrations.monitor.RoutingMonitor`) and transformers' Trainer
(`moegrok.integrations.transformers.MoegrokCallback`). Install with `pip install 'moegrok[torch]'`."""
