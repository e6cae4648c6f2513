"""tokenclean: token-level data cleaning for LLM supervised fine-tuning (Pang et al., ICML 2025)."""

__version__ = "0.1.0"
