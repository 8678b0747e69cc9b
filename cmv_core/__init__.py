"""cmv-persuasion: fine-tune Llama 3.2 on Change My View threads and measure persuasion."""

__version__ = "0.1.0"
