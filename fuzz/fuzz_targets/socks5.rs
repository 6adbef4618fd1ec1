//! The proxy's SOCKS5 greeting, user/pass and request parsers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_agent::proxy::fuzzing::fuzz_socks5(data));
