//! Arbitrary stream operations on a connected agent/server pair.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_proto::fuzzing::stream_ops(data));
