//! Image references: `NAME:TAG`, as users type them and the API carries them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::NameError;

/// The name of an image in the repository (same rules as service names).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

/// A movable label on one version of an image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

/// `NAME:TAG`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    /// The image.
    pub name: ImageName,
    /// The tag.
    pub tag: Tag,
}

/// Why a string is not a valid image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    /// The name part is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The tag part is invalid.
    #[error("invalid tag {value:?} in {input:?}: {reason}; use 1-128 characters from A-Z a-z 0-9 . _ -, not starting with . or -")]
    Tag {
        input: String,
        value: String,
        reason: &'static str,
    },
    /// There is no `:TAG`.
    #[error("{0:?} has no tag: write NAME:TAG, e.g. {0}:v1")]
    MissingTag(String),
}

impl ImageName {
    /// Validates `value` with the project's name rules.
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        crate::names::check_name("image name", &value)?;
        Ok(Self(value))
    }
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Tag {
    /// Validates a tag.
    pub fn new(value: impl Into<String>) -> Result<Self, ImageRefError> {
        let value = value.into();
        let fail = |reason| {
            Err(ImageRefError::Tag {
                input: value.clone(),
                value: value.clone(),
                reason,
            })
        };
        if value.is_empty() {
            return fail("it is empty");
        }
        if value.len() > 128 {
            return fail("it is longer than 128 characters");
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return fail("it contains another character");
        }
        if value.starts_with('.') || value.starts_with('-') {
            return fail("it starts with . or -");
        }
        Ok(Self(value))
    }
    /// The tag as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ImageRef {
    /// Parses `NAME:TAG`.
    pub fn parse(input: &str) -> Result<Self, ImageRefError> {
        let (name, tag) = input
            .split_once(':')
            .ok_or_else(|| ImageRefError::MissingTag(input.to_owned()))?;
        let name = ImageName::new(name)?;
        let tag = Tag::new(tag).map_err(|e| match e {
            ImageRefError::Tag { value, reason, .. } => ImageRefError::Tag {
                input: input.to_owned(),
                value,
                reason,
            },
            other => other,
        })?;
        Ok(Self { name, tag })
    }
}

macro_rules! string_impls {
    ($ty:ident, $err:ty, $ctor:expr) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $ty {
            type Err = $err;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ctor(s)
            }
        }
        impl TryFrom<String> for $ty {
            type Error = $err;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $ctor(&s)
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }
    };
}

string_impls!(ImageName, NameError, ImageName::new);
string_impls!(Tag, ImageRefError, Tag::new);

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}
impl FromStr for ImageRef {
    type Err = ImageRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
impl TryFrom<String> for ImageRef {
    type Error = ImageRefError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}
impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_tag() {
        let r = ImageRef::parse("web:v1.2_rc-3").unwrap();
        assert_eq!(r.name.as_str(), "web");
        assert_eq!(r.tag.as_str(), "v1.2_rc-3");
        assert_eq!(r.to_string(), "web:v1.2_rc-3");
    }

    #[test]
    fn bad_references_say_what_to_write() {
        let missing = ImageRef::parse("web").unwrap_err().to_string();
        assert!(missing.contains("NAME:TAG"), "{missing}");
        let traversal = ImageRef::parse("../x:v1").unwrap_err().to_string();
        assert!(traversal.contains("image name"), "{traversal}");
        let bad_tag = ImageRef::parse("web:../x").unwrap_err().to_string();
        assert!(bad_tag.contains("invalid tag"), "{bad_tag}");
        assert!(ImageRef::parse("web:").is_err());
        assert!(ImageRef::parse("web:a/b").is_err());
    }
}
