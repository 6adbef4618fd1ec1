//! CONNECT targets, proxy credentials, egress rules, server addresses and configuration files.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_agent::proxy::fuzzing::fuzz_settings_text(data));
