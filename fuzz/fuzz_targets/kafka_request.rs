//! Any bytes as a request frame's body, through the listener's own decoding
//! (`broker/src/kafka/codec.rs`, compiled here as is): it may refuse them, never panic. Each
//! served API is tried at every version the codec knows, as the listener would for a client
//! that claims it (the listener also refuses versions it does not serve before decoding).
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use libfuzzer_sys::fuzz_target;

#[path = "../../broker/src/kafka/codec.rs"]
#[allow(dead_code)]
mod codec;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let Ok((key, version, _)) = codec::peek_header(&frame) else {
        return;
    };
    let Ok(api) = ApiKey::try_from(key) else {
        return;
    };
    let versions = api.valid_versions();
    if !(versions.min..=versions.max).contains(&version) {
        return;
    }
    let _ = codec::decode_unguarded(api, version, frame);
});
