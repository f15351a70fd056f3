"""gristmill: data selection and curation for LLM pretraining and fine-tuning."""

__version__ = "0.1.0"
