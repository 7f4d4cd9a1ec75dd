//! Errors of the compute core: a kind a caller can match on, and a message
//! that tells a person what went wrong and what to do.

/// What went wrong, for callers that react differently to each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operands do not fit together or do not match the stated shape.
    Shape,
    /// The problem exceeds a limit of the device or of the configuration.
    TooLarge,
    /// The backend's driver or device is not present on this machine.
    Unavailable,
    /// The device failed: compilation, launch, transfer or a lost device.
    Device,
    /// A model file is unreadable, corrupt or of an unsupported kind, or a
    /// request does not fit the model (a prompt longer than its context).
    Model,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn device(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Device, message)
    }
    pub fn model(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Model, message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
