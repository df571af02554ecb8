//! Validated names. A name that reaches a file path, a QEMU command line or a URL has passed
//! through one of these constructors, so no other part has to re-check it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest name we accept: a DNS label's limit, so a name always fits a host name.
const MAX_NAME_LEN: usize = 63;

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}; use 1-63 characters from a-z, 0-9 and '-', starting with a letter or digit")]
pub struct NameError {
    /// What the name was meant to be ("instance id", "service name").
    pub kind: &'static str,
    /// The rejected input.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

pub(crate) fn check_name(kind: &'static str, value: &str) -> Result<(), NameError> {
    let fail = |reason| {
        Err(NameError {
            kind,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("it is empty");
    }
    if value.len() > MAX_NAME_LEN {
        return fail("it is longer than 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("it contains a character other than a-z, 0-9 and '-'");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return fail("it starts or ends with '-'");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The id of one instance (one running or suspended copy of a service's VM). It is passed to
    /// the guest as its SMBIOS serial number, so it survives suspend, resume and migration.
    InstanceId,
    "instance id"
);

name_type!(
    /// The name of a service: a named workload with an image, a priority and instance bounds.
    ServiceName,
    "service name"
);

name_type!(
    /// The name of a real machine (an agent's `--name`): part of file paths, events and
    /// metrics, and what a machine's credential is bound to.
    MachineName,
    "machine name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["a", "web-1", "finance", "0abc", &"x".repeat(63)] {
            assert!(InstanceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("-a", "starts or ends"),
            ("a-", "starts or ends"),
            ("A", "character"),
            ("a b", "character"),
            ("../etc", "character"),
            ("a,serial=x", "character"),
        ];
        for (bad, why) in cases {
            let err = InstanceId::new(bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        assert!(ServiceName::new("x".repeat(64)).is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: ServiceName = serde_json::from_str("\"sports\"").expect("valid");
        assert_eq!(ok.as_str(), "sports");
        assert!(serde_json::from_str::<ServiceName>("\"Sports\"").is_err());
    }
}
