//! Arbitrary bytes into the frame decoder, whole and in pieces.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_proto::fuzzing::frame_decode(data));
