//! OpenAI-compatible vision provider (written by another engineer).
