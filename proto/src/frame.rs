//! Watch responses encoded once and sent to many watchers.
//!
//! A control replica hands every revision to every watcher it serves;
//! encoding the same `WatchResponse` once per watcher was most of the cost of
//! that fan-out. An [`EncodedWatchResponse`] is encoded once, an event at a
//! time, and a watcher's [`WatchFrame`] is cut from it by kind without
//! encoding anything: the frame's pieces, concatenated, are byte for byte the
//! protobuf encoding of the filtered `WatchResponse`, so clients decode it
//! with the ordinary generated type. [`WatchCodec`] writes frames on the wire;
//! `fanout::resources_server` (generated in `build.rs`) serves `Watch` with it.

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

use crate::Kind;
use crate::v1::{WatchEvent, WatchRequest, WatchResponse};

/// `WatchResponse.events`' field number: each event is encoded as this field.
const EVENTS_FIELD: u32 = 2;

/// One revision's `WatchResponse`, encoded once; see the module doc.
#[derive(Debug, Clone)]
pub struct EncodedWatchResponse {
    revision: u64,
    initial: bool,
    commit_time_unix_nanos: i64,
    /// The fields before `events` (the revision), encoded.
    head: Bytes,
    /// Each event as an `events` field (tag, length, message), with its kind.
    events: Vec<(Option<Kind>, Bytes)>,
    /// The fields after `events` (`initial`, the commit time), encoded.
    tail: Bytes,
}

impl EncodedWatchResponse {
    pub fn new(resp: &WatchResponse) -> Self {
        let head = WatchResponse {
            revision: resp.revision,
            ..Default::default()
        };
        let tail = WatchResponse {
            initial: resp.initial,
            commit_time_unix_nanos: resp.commit_time_unix_nanos,
            ..Default::default()
        };
        Self {
            revision: resp.revision,
            initial: resp.initial,
            commit_time_unix_nanos: resp.commit_time_unix_nanos,
            head: head.encode_to_vec().into(),
            events: resp.events.iter().map(encode_event).collect(),
            tail: tail.encode_to_vec().into(),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A full-state replacement, not a change.
    pub fn initial(&self) -> bool {
        self.initial
    }

    pub fn commit_time_unix_nanos(&self) -> i64 {
        self.commit_time_unix_nanos
    }

    /// The frame for a watcher of `kinds` (all when empty): None when no
    /// event is left and the response is not a full-state replacement.
    pub fn frame(&self, kinds: &[Kind]) -> Option<WatchFrame> {
        let mut parts = Vec::with_capacity(self.events.len() + 2);
        parts.push(self.head.clone());
        parts.extend(
            self.events
                .iter()
                .filter(|(kind, _)| kinds.is_empty() || kind.is_some_and(|k| kinds.contains(&k)))
                .map(|(_, bytes)| bytes.clone()),
        );
        let events = parts.len() - 1;
        if events == 0 && !self.initial {
            return None;
        }
        parts.push(self.tail.clone());
        Some(WatchFrame { parts, events })
    }
}

fn encode_event(event: &WatchEvent) -> (Option<Kind>, Bytes) {
    let kind = event.object.as_ref().and_then(|o| o.kind());
    let mut buf = Vec::with_capacity(prost::encoding::message::encoded_len(EVENTS_FIELD, event));
    prost::encoding::message::encode(EVENTS_FIELD, event, &mut buf);
    (kind, buf.into())
}

/// One `WatchResponse` on the wire, in pieces shared with other watchers'
/// frames.
#[derive(Debug, Clone, Default)]
pub struct WatchFrame {
    parts: Vec<Bytes>,
    events: usize,
}

impl WatchFrame {
    /// How many events the frame carries.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Encoded length in bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    /// The encoded `WatchResponse` in one piece (tests, debugging; the wire
    /// path writes the pieces as they are).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

/// For the odd response sent to one watcher only (a progress bookmark).
impl From<&WatchResponse> for WatchFrame {
    fn from(resp: &WatchResponse) -> Self {
        Self {
            parts: vec![resp.encode_to_vec().into()],
            events: resp.events.len(),
        }
    }
}

/// The `Watch` method's codec: requests decode as usual, responses are
/// [`WatchFrame`]s written as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchFrame;
    type Decode = WatchRequest;
    type Encoder = FrameEncoder;
    type Decoder = ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Copies a frame's pieces into the message buffer.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = WatchFrame;
    type Error = Status;

    fn encode(&mut self, frame: WatchFrame, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(frame.len());
        for part in &frame.parts {
            buf.put_slice(part);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{EventType, Object, object};

    fn event(kind: object::Kind, name: &str, t: EventType) -> WatchEvent {
        let mut o = Object { kind: Some(kind) };
        if let Some(m) = o.metadata_mut() {
            m.name = name.into();
            m.namespace = "default".into();
        }
        WatchEvent {
            r#type: t as i32,
            object: Some(o),
        }
    }

    fn response(initial: bool) -> WatchResponse {
        WatchResponse {
            revision: 300,
            events: vec![
                event(
                    object::Kind::Service(Default::default()),
                    "a",
                    EventType::Added,
                ),
                event(
                    object::Kind::EndpointSlice(Default::default()),
                    "a-x",
                    EventType::Modified,
                ),
                event(
                    object::Kind::Pod(Default::default()),
                    "p",
                    EventType::Deleted,
                ),
            ],
            initial,
            commit_time_unix_nanos: 1_700_000_000_123_456_789,
        }
    }

    /// What the per-watcher path used to send: clone, filter, encode.
    fn filtered(resp: &WatchResponse, kinds: &[Kind]) -> WatchResponse {
        WatchResponse {
            events: resp
                .events
                .iter()
                .filter(|e| {
                    kinds.is_empty()
                        || e.object
                            .as_ref()
                            .and_then(Object::kind)
                            .is_some_and(|k| kinds.contains(&k))
                })
                .cloned()
                .collect(),
            ..resp.clone()
        }
    }

    #[test]
    fn frames_are_the_filtered_response_byte_for_byte() {
        let filters: [&[Kind]; 4] = [
            &[],
            &[Kind::Service, Kind::EndpointSlice],
            &[Kind::Pod],
            &[Kind::Node],
        ];
        for initial in [false, true] {
            let resp = response(initial);
            let encoded = EncodedWatchResponse::new(&resp);
            for kinds in filters {
                let want = filtered(&resp, kinds);
                match encoded.frame(kinds) {
                    Some(frame) => {
                        assert_eq!(frame.to_vec(), want.encode_to_vec(), "{kinds:?}");
                        assert_eq!(frame.len(), want.encoded_len());
                        assert_eq!(frame.events(), want.events.len());
                        let back = WatchResponse::decode(frame.to_vec().as_slice())
                            .expect("frame decodes");
                        assert_eq!(back, want);
                    }
                    None => assert!(want.events.is_empty() && !initial, "{kinds:?}"),
                }
            }
        }
    }

    #[test]
    fn nothing_of_interest_is_no_frame_unless_initial() {
        let mut resp = response(false);
        assert!(
            EncodedWatchResponse::new(&resp)
                .frame(&[Kind::Node])
                .is_none()
        );
        resp.initial = true;
        resp.events.clear();
        let frame = EncodedWatchResponse::new(&resp)
            .frame(&[Kind::Node])
            .expect("an empty full state is still sent");
        assert_eq!(frame.to_vec(), resp.encode_to_vec());
    }

    #[test]
    fn zero_fields_are_omitted_like_prost_does() {
        let resp = WatchResponse::default();
        let frame = EncodedWatchResponse::new(&WatchResponse {
            initial: true,
            ..resp.clone()
        })
        .frame(&[])
        .expect("initial");
        assert_eq!(
            frame.to_vec(),
            WatchResponse {
                initial: true,
                ..resp
            }
            .encode_to_vec()
        );
        assert_eq!(WatchFrame::from(&WatchResponse::default()).to_vec(), b"");
    }
}
