//! Entry points for fuzzing this crate's parsers of network input. Each must never panic,
//! whatever the bytes.
