//! Open-ended fuzzing of the frame decoder (the bounded, seeded run of the same target is
//! `codec::tests::decoder_survives_seeded_mutations`, part of the normal test command).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_runtime::codec::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::from_wire(data, 1 << 20) {
        // Anything that validates must be readable all the way down.
        let _ = frame.to_owned_envelope().expect("validated frame deserializes");
    }
});
