"""Integrations with training frameworks (Hugging Face Trainer now; timm in kd_plugins.integrations.timm)."""
