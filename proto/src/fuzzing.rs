//! Fuzz entry points (placeholder).
