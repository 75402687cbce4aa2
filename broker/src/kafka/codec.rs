//! Kafka request frames in, response frames out: the listener's only contact with untrusted
//! bytes, kept free of the broker's other dependencies so the fuzz target
//! (`fuzz/fuzz_targets/kafka_request.rs`) compiles this very file.

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};

/// Why a frame is refused: its connection is closed, with this in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// API key, version and correlation id, read before anything is decoded (a frame too short to
/// hold them is malformed).
pub fn peek_header(frame: &Bytes) -> Result<(i16, i16, i32), Malformed> {
    if frame.len() < 8 {
        return Err(Malformed(format!(
            "a {}-byte frame holds no request header",
            frame.len()
        )));
    }
    let mut peek = &frame[..8];
    Ok((peek.get_i16(), peek.get_i16(), peek.get_i32()))
}

/// Decode the header and body; also how many bytes were left over. No guard: the fuzz
/// target calls this, so a panic in the generated codec shows there.
pub fn decode_unguarded(
    api: ApiKey,
    version: i16,
    frame: Bytes,
) -> anyhow::Result<(RequestHeader, RequestKind, usize)> {
    let mut buf = frame;
    let header = RequestHeader::decode(&mut buf, api.request_header_version(version))?;
    let request = RequestKind::decode(api, &mut buf, version)?;
    Ok((header, request, buf.remaining()))
}

/// [`decode_unguarded`], with a request that leaves bytes over refused, and a panic inside the
/// generated codec turned into a malformed request rather than trusted never to happen.
pub fn decode(
    api: ApiKey,
    version: i16,
    frame: Bytes,
) -> Result<(RequestHeader, RequestKind), Malformed> {
    match std::panic::catch_unwind(move || decode_unguarded(api, version, frame)) {
        Ok(Ok((header, request, 0))) => Ok((header, request)),
        Ok(Ok((_, _, left))) => Err(Malformed(format!(
            "{api:?} v{version}: {left} bytes after the request"
        ))),
        Ok(Err(e)) => Err(Malformed(format!("{api:?} v{version}: {e:#}"))),
        Err(_) => Err(Malformed(format!(
            "{api:?} v{version}: the decoder panicked"
        ))),
    }
}

pub fn encode(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Result<BytesMut, Malformed> {
    let mut out = BytesMut::new();
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let encoded = header
        .encode(&mut out, api.response_header_version(version))
        .and_then(|()| response.encode(&mut out, version));
    match encoded {
        Ok(()) => Ok(out),
        // Our own answer does not fit the version (a value out of its range): a bug, but this
        // client's connection is the only thing it should cost.
        Err(e) => Err(Malformed(format!(
            "encoding the {api:?} v{version} answer: {e:#}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// What the fuzz target does, in the test suite: random bodies behind a real API key
        /// and version (the part that reaches the generated codec) never panic it.
        #[test]
        fn random_bodies_never_panic_the_decoder(
            key in 0i16..100,
            version in 0i16..20,
            correlation in any::<i32>(),
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut frame = Vec::with_capacity(body.len() + 8);
            frame.extend_from_slice(&key.to_be_bytes());
            frame.extend_from_slice(&version.to_be_bytes());
            frame.extend_from_slice(&correlation.to_be_bytes());
            frame.extend_from_slice(&body);
            let frame = Bytes::from(frame);
            prop_assert_eq!(peek_header(&frame).ok(), Some((key, version, correlation)));
            if let Ok(api) = ApiKey::try_from(key) {
                let known = api.valid_versions();
                if (known.min..=known.max).contains(&version) {
                    let _ = decode_unguarded(api, version, frame);
                }
            }
        }
    }

    #[test]
    fn short_frames_are_malformed() {
        for len in 0..8 {
            assert!(peek_header(&Bytes::from(vec![0u8; len])).is_err());
        }
    }
}
