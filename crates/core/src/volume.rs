//! Persistent volumes: data disks that belong to an instance *slot* (service and ordinal), not
//! to an instance, so that they outlive discard, recovery, suspend and scale-in. Declared per
//! service (`[[service.volume]] name = "data", size = "1G"`); stored in the repository as an
//! image per slot and volume (`vol-SERVICE-SLOT-NAME`), whose `latest` tag the running
//! instance's machine moves each time it stores what the guest wrote.

use serde::{Deserialize, Serialize};

use crate::ImageRef;

/// The most volumes one service declares.
pub const MAX_VOLUMES: usize = 8;
/// The smallest volume.
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;
/// The largest volume.
pub const MAX_VOLUME_BYTES: u64 = 4 << 40;
/// The tag of a volume's current contents.
pub const LATEST: &str = "latest";

/// One volume of a service, as the services file declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// `[a-z][a-z0-9-]*`, at most 16 characters, unique within the service; the guest sees
    /// the disk with serial `vmx-vol-NAME`.
    pub name: String,
    /// Its size: bytes, or a number with K, M, G or T (`"1G"`).
    #[serde(with = "size_text")]
    pub size: u64,
}

/// A volume attached to one instance: which image holds it and how large it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePlan {
    /// The volume's name (the guest sees serial `vmx-vol-NAME`).
    pub name: String,
    /// The repository image of the slot's volume, at its `latest` tag (none yet: a blank disk).
    pub image: ImageRef,
    /// Its size, bytes.
    pub size: u64,
}

/// The repository image of volume `name` of `service`'s slot `slot`.
pub fn volume_image(service: &str, slot: u32, name: &str) -> Result<ImageRef, String> {
    ImageRef::parse(&format!("vol-{service}-{slot}-{name}:{LATEST}")).map_err(|e| e.to_string())
}

/// What is wrong with a service's volumes, if anything.
pub fn volumes_problem(service: &str, volumes: &[VolumeSpec]) -> Option<String> {
    if volumes.len() > MAX_VOLUMES {
        return Some(format!(
            "{} volumes declared; at most {MAX_VOLUMES} per service",
            volumes.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for v in volumes {
        let ok = !v.name.is_empty()
            && v.name.len() <= 16
            && v.name.starts_with(|c: char| c.is_ascii_lowercase())
            && !v.name.ends_with('-')
            && v.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Some(format!(
                "volume name {:?} must be 1-16 characters from a-z 0-9 -, starting with a letter",
                v.name
            ));
        }
        if !seen.insert(v.name.as_str()) {
            return Some(format!("volume {} is declared twice", v.name));
        }
        if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&v.size) {
            return Some(format!(
                "volume {}: size must be 1M to 4T (got {} bytes)",
                v.name, v.size
            ));
        }
        if v.size % 512 != 0 {
            return Some(format!(
                "volume {}: size must be a whole number of 512-byte sectors (got {} bytes)",
                v.name, v.size
            ));
        }
        // The largest slot is 4 digits (at most 1000 instances).
        if volume_image(service, 1000, &v.name).is_err() {
            return Some(format!(
                "volume {}: the service's name and the volume's are too long together to name \
                 its image (vol-SERVICE-SLOT-NAME, at most 63 characters); shorten one",
                v.name
            ));
        }
    }
    None
}

/// Parses a size: bytes, or a whole number with K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown unit {c:?} in {s:?}: use K, M, G or T")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a size: use a whole number with K, M, G or T (e.g. 4G)")
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size written as text (`"1G"`) or a number of bytes; written back as bytes.
mod size_text {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Size::deserialize(d)? {
            Size::Bytes(b) => Ok(b),
            Size::Text(t) => super::parse_size(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, size: u64) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size,
        }
    }

    #[test]
    fn sizes_parse_and_volumes_are_checked() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").unwrap_err().contains("K, M, G or T"));
        assert!(parse_size("x").is_err());
        assert_eq!(volumes_problem("web", &[vol("data", 1 << 30)]), None);
        assert!(volumes_problem("web", &[vol("Data", 1 << 30)]).is_some());
        assert!(volumes_problem("web", &[vol("9data", 1 << 30)]).is_some());
        assert!(volumes_problem("web", &[vol("data", 1000)])
            .unwrap()
            .contains("1M to 4T"));
        assert!(
            volumes_problem("web", &[vol("data", 1 << 30), vol("data", 1 << 30)])
                .unwrap()
                .contains("twice")
        );
        let long = "s".repeat(50);
        assert!(volumes_problem(&long, &[vol("database", 1 << 30)])
            .unwrap()
            .contains("too long"));
        assert_eq!(
            volume_image("web", 2, "data").unwrap().to_string(),
            "vol-web-2-data:latest"
        );
    }

    #[test]
    fn a_size_is_text_or_bytes() {
        #[derive(Deserialize)]
        struct F {
            volume: Vec<VolumeSpec>,
        }
        let f: F = toml::from_str(
            "[[volume]]\nname = \"data\"\nsize = \"1G\"\n[[volume]]\nname = \"logs\"\nsize = 1048576\n",
        )
        .unwrap();
        assert_eq!(f.volume[0].size, 1 << 30);
        assert_eq!(f.volume[1].size, 1 << 20);
    }
}
