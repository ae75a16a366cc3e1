//! JWT authentication (feature `jwt`), verified with the `jsonwebtoken` crate.

use async_trait::async_trait;
use http::request::Parts;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use switchboard_core::{Identity, Timestamp};

use crate::auth::{token, Authenticator, Refusal, DEFAULT_COOKIE};

/// Accepts HS256 JSON Web Tokens signed with a shared secret: the user is the
/// `sub` claim, every claim goes to the policy as [`Identity::claims`], and
/// `exp` is required and checked, at admission and while the session lives
/// (it is the session's [`Identity::expires_at`]: closed `token_expired`
/// unless a `refresh` frame brings a newer token). The token comes from the `Authorization:
/// Bearer` header, the `token` query parameter or the `switchboard_token`
/// cookie.
#[derive(Clone)]
pub struct JwtAuthenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    cookie: String,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator").finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Verifies tokens signed with `secret` (HS256).
    #[must_use]
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // `exp` is enforced to the second while a session is open (closed
        // `token_expired`), so admission uses the same moment: no leeway.
        validation.leeway = 0;
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            cookie: DEFAULT_COOKIE.to_owned(),
        }
    }

    /// Looks for the token in the cookie `name` too.
    #[must_use]
    pub fn cookie(mut self, name: impl Into<String>) -> Self {
        self.cookie = name.into();
        self
    }

    /// Signs a token for `user` valid for `ttl_secs` from `now_unix_secs`,
    /// with extra `claims` (an object, or `Null`). For demo logins and tests.
    ///
    /// # Errors
    /// When the claims do not serialize.
    pub fn issue(
        &self,
        user: &str,
        now_unix_secs: u64,
        ttl_secs: u64,
        claims: serde_json::Value,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let mut all = match claims {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        all.insert("sub".into(), user.into());
        all.insert("exp".into(), (now_unix_secs + ttl_secs).into());
        encode(&Header::new(Algorithm::HS256), &all, &self.encoding)
    }

    /// Verifies a token; the identity it carries.
    ///
    /// # Errors
    /// A `forbidden` refusal saying what is wrong.
    pub fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        let data = decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.decoding,
            &self.validation,
        )
        .map_err(|e| Refusal::forbidden(format!("invalid token: {e}")))?;
        let user = data
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Refusal::forbidden("token has no `sub`"))?
            .to_owned();
        let exp = data.claims.get("exp").and_then(serde_json::Value::as_u64);
        let identity = Identity::new(user).with_claims(serde_json::Value::Object(data.claims));
        // The core's time is Unix milliseconds (the runtime's clock).
        Ok(match exp {
            Some(exp) => identity.with_expiry(Timestamp::from_millis(exp.saturating_mul(1000))),
            None => identity,
        })
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, request: &Parts) -> Result<Identity, Refusal> {
        let token =
            token(request, &self.cookie).ok_or_else(|| Refusal::forbidden("missing token"))?;
        self.verify(&token)
    }

    async fn authenticate_token(&self, token: &str) -> Result<Identity, Refusal> {
        self.verify(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn issues_and_verifies() {
        let auth = JwtAuthenticator::hs256(b"secret");
        let token = auth
            .issue("alice", now(), 60, serde_json::json!({"role": "admin"}))
            .unwrap();
        let identity = auth.verify(&token).unwrap();
        assert_eq!(identity.user.as_str(), "alice");
        assert_eq!(identity.claims["role"], "admin");
        let exp = identity.claims["exp"].as_u64().unwrap();
        assert_eq!(
            identity.expires_at,
            Some(Timestamp::from_millis(exp * 1000))
        );
    }

    #[test]
    fn refuses_expired_forged_and_garbage_tokens() {
        let auth = JwtAuthenticator::hs256(b"secret");
        let expired = auth
            .issue("alice", now() - 3600, 60, serde_json::Value::Null)
            .unwrap();
        assert!(auth.verify(&expired).is_err());
        let forged = JwtAuthenticator::hs256(b"other")
            .issue("alice", now(), 60, serde_json::Value::Null)
            .unwrap();
        assert!(auth.verify(&forged).is_err());
        assert!(auth.verify("not.a.token").is_err());
    }
}
