//! How a request to the node failed, for the API's status code.

/// The caller's fault (400) or ours (500).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

pub type NodeResult<T> = std::result::Result<T, NodeError>;

pub fn bad<T>(msg: impl Into<String>) -> NodeResult<T> {
    Err(NodeError::BadRequest(msg.into()))
}
