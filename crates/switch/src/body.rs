//! A request's body on its way to an instance: read whole (small, so it can be sent again on a
//! retry) or streamed from the client as the instance reads it (see [`crate::limits`]).

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::limits::Reservation;
use crate::pool::ProxyBody;

pub(crate) enum RequestBody {
    /// Read whole; its bytes count against the switch's body budget while it lives.
    Whole {
        bytes: Bytes,
        _held: Option<Reservation>,
    },
    /// The client's own body, until an attempt takes it.
    Stream(Option<Incoming>),
}

impl RequestBody {
    pub(crate) fn empty() -> Self {
        Self::Whole {
            bytes: Bytes::new(),
            _held: None,
        }
    }

    /// The body for the next attempt; None once a streamed body has been taken.
    pub(crate) fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            Self::Whole { bytes, .. } => Some(Either::Left(Full::new(bytes.clone()))),
            Self::Stream(s) => s.take().map(Either::Right),
        }
    }

    /// Whether another attempt can send it again after this one.
    pub(crate) fn resendable(&self) -> bool {
        matches!(self, Self::Whole { .. })
    }

    /// Gives back a streamed body that no attempt sent (no connection could be made).
    pub(crate) fn put_back(&mut self, body: ProxyBody) {
        if let (Self::Stream(slot), Either::Right(incoming)) = (self, body) {
            *slot = Some(incoming);
        }
    }
}
