//! How a proxied connection can end, and the metric label of each way.

use crate::{
    kafka::{frame::FrameError, sasl::SaslError},
    proxy::{budget::BudgetError, rewrite::declaration::RewriteError},
    upstream::UpstreamError,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("{0} (--sasl-enable)")]
    Sasl(#[from] SaslError),
    #[error("timed out authenticating to broker {0} (--sasl-enable)")]
    SaslTimeout(String),
    #[error("client: {0}")]
    Client(FrameError),
    #[error("broker: {0}")]
    Broker(FrameError),
    #[error("request for forbidden api {api} ({key}) refused (--forbidden-api-keys)")]
    Forbidden { api: &'static str, key: i16 },
    #[error("broker closed the connection with {0} request(s) in flight")]
    BrokerClosed(usize),
    #[error("broker sent a response nobody asked for")]
    Unsolicited,
    #[error("response correlation id {got} does not match the oldest request's {expected}")]
    CorrelationMismatch { expected: i32, got: i32 },
    #[error("{0}")]
    Rewrite(#[from] RewriteError),
    #[error("cannot map broker(s) in the response: {0}")]
    Unmappable(String),
    #[error("writing to the client: {0}")]
    ClientWrite(std::io::Error),
    #[error("{0}")]
    RewriteBudget(#[from] BudgetError),
    #[error("kernel path (--bulk-transfer sockmap): {0}")]
    KernelPath(std::io::Error),
    #[error("io_uring path (--bulk-transfer uring): {0}")]
    Uring(std::io::Error),
}

/// The client went away (closed or reset its socket), e.g. in the middle of a Fetch
/// long-poll: ordinary for Kafka clients, not a fault of kpscd or the broker.
fn client_left(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
}

impl ConnError {
    /// Worth a warning: everything but a client leaving.
    pub fn is_fault(&self) -> bool {
        self.reason() != "client_closed"
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnError::Upstream(e) => e.reason(),
            ConnError::Sasl(_) | ConnError::SaslTimeout(_) => "broker_sasl",
            ConnError::Client(FrameError::TooLarge { .. }) => "client_frame_too_large",
            ConnError::Client(FrameError::NegativeSize(_) | FrameError::TooSmall { .. }) => {
                "client_bad_size"
            }
            ConnError::Client(FrameError::BadHeader(_)) => "client_bad_header",
            ConnError::Client(FrameError::Truncated) => "client_truncated",
            ConnError::Client(FrameError::Io(e)) | ConnError::ClientWrite(e) if client_left(e) => {
                "client_closed"
            }
            ConnError::Client(FrameError::Io(_)) | ConnError::ClientWrite(_) => "client_io",
            ConnError::Broker(FrameError::Io(_)) => "broker_io",
            ConnError::Broker(_) => "broker_bad_frame",
            ConnError::Forbidden { .. } => "forbidden_api",
            ConnError::BrokerClosed(_) => "broker_closed",
            ConnError::Unsolicited | ConnError::CorrelationMismatch { .. } => "broker_protocol",
            ConnError::Rewrite(RewriteError::Unmapped { .. }) | ConnError::Unmappable(_) => {
                "unmapped_broker"
            }
            ConnError::Rewrite(_) => "rewrite_failed",
            ConnError::RewriteBudget(_) => "rewrite_budget",
            ConnError::KernelPath(_) => "kernel_path",
            ConnError::Uring(_) => "uring_path",
        }
    }
}
