//! Bearer tokens as every API of the matrix checks them.

use subtle::ConstantTimeEq;

/// Whether an `Authorization` header value carries `token` as a bearer token. The comparison
/// takes the same time wherever the first difference is (a timing probe learns at most the
/// token's length); an empty expected token matches nothing.
pub fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let Some(given) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cret2"), "s3cret"));
        assert!(!bearer_matches(Some("bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some("s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
        assert!(!bearer_matches(Some("Bearer "), ""));
    }
}
