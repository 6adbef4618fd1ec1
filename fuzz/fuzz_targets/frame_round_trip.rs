//! Well-formed frames encoded, split anywhere and decoded back.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_proto::fuzzing::frame_round_trip(data));
