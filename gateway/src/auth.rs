//! JWT verification (and, only when enabled, dev token issuance).
//!
//! The algorithm is pinned by configuration, never taken from the token: a
//! token with `alg: none`, or an HS256 token signed with the RS256 public key
//! as its secret, is refused. `exp` is required; `aud` and `iss` are checked
//! only when configured.

use std::sync::Arc;

use axum::{extract::FromRequestParts, http::request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};

use crate::{Config, error::ApiError};

/// RFC 7518 3.2: an HS256 key should be at least as long as the hash.
const MIN_SECRET_BYTES: usize = 32;

/// Claims we read and write.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Every other claim (the role claim among them).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The role that may change the character catalogue.
pub const ADMIN_ROLE: &str = "admin";

/// Verifies tokens; shared by every request.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    /// Present only when dev login is enabled (HS256).
    issuer: Option<EncodingKey>,
    /// The claim naming the caller's role (`AUTH_ROLE_CLAIM`).
    role_claim: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .field("dev_login", &self.issuer.is_some())
            .finish_non_exhaustive()
    }
}

/// An authenticated user (the JWT `sub`), from `Authorization: Bearer` only.
#[derive(Debug, Clone)]
pub struct User(pub String);

/// An authenticated user whose role claim says `admin`; anyone else with a
/// valid token gets 403 `forbidden`.
#[derive(Debug, Clone)]
pub struct Admin(pub String);

/// An authenticated user from `Authorization: Bearer` or `?access_token=`
/// (for browsers' WebSocket and EventSource, which cannot set headers).
#[derive(Debug, Clone)]
pub struct StreamUser(pub String);

impl Authenticator {
    /// Builds the verifier from configuration.
    ///
    /// # Errors
    /// When no key is configured, the secret is empty, a key does not parse,
    /// the algorithm does not fit the key, or dev login is asked for without a secret.
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let pinned = config
            .auth_jwt_algorithm
            .as_deref()
            .map(|name| match name.to_ascii_uppercase().as_str() {
                "HS256" => Ok(Algorithm::HS256),
                "RS256" => Ok(Algorithm::RS256),
                "ES256" => Ok(Algorithm::ES256),
                other => Err(anyhow::anyhow!(
                    "AUTH_JWT_ALGORITHM {other:?} is not one of HS256, RS256, ES256"
                )),
            })
            .transpose()?;
        let (key, algorithm, issuer) = match (&config.auth_jwt_secret, &config.auth_jwt_public_key)
        {
            (Some(_), Some(_)) => {
                anyhow::bail!("set only one of AUTH_JWT_SECRET and AUTH_JWT_PUBLIC_KEY")
            }
            (None, None) => anyhow::bail!(
                "no JWT key: set AUTH_JWT_SECRET (HS256) or AUTH_JWT_PUBLIC_KEY (PEM, RS256/ES256)"
            ),
            (Some(secret), None) => {
                let bytes = secret.expose_secret().as_bytes();
                anyhow::ensure!(!bytes.is_empty(), "AUTH_JWT_SECRET is empty");
                // The contract takes the key as given (an identity provider's
                // secret is what it is), so a weak one is the operator's call.
                if bytes.len() < MIN_SECRET_BYTES {
                    tracing::warn!(
                        bytes = bytes.len(),
                        recommended = MIN_SECRET_BYTES,
                        "AUTH_JWT_SECRET is shorter than HS256's 32-byte hash; tokens are easier to forge by guessing it."
                    );
                }
                anyhow::ensure!(
                    pinned.is_none_or(|a| a == Algorithm::HS256),
                    "AUTH_JWT_SECRET is an HS256 key; AUTH_JWT_ALGORITHM must be HS256"
                );
                let issuer = config.dev_login.then(|| EncodingKey::from_secret(bytes));
                (DecodingKey::from_secret(bytes), Algorithm::HS256, issuer)
            }
            (None, Some(pem)) => {
                anyhow::ensure!(
                    !config.dev_login,
                    "GATEWAY_DEV_LOGIN needs AUTH_JWT_SECRET (it signs HS256 tokens)"
                );
                let text = if pem.contains("-----BEGIN") {
                    pem.clone()
                } else {
                    std::fs::read_to_string(pem).map_err(|e| {
                        anyhow::anyhow!("AUTH_JWT_PUBLIC_KEY: cannot read PEM file {pem}: {e}")
                    })?
                };
                let (key, algorithm) = match (
                    DecodingKey::from_rsa_pem(text.as_bytes()),
                    DecodingKey::from_ec_pem(text.as_bytes()),
                ) {
                    (Ok(key), _) => (key, Algorithm::RS256),
                    (_, Ok(key)) => (key, Algorithm::ES256),
                    _ => anyhow::bail!("AUTH_JWT_PUBLIC_KEY is not an RSA or EC public key in PEM"),
                };
                if let Some(p) = pinned {
                    anyhow::ensure!(
                        p == algorithm,
                        "AUTH_JWT_ALGORITHM {p:?} does not fit the public key ({algorithm:?})"
                    );
                }
                (key, algorithm, None)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &config.auth_jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.auth_jwt_issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self {
            key,
            validation,
            issuer,
            role_claim: config.auth_role_claim.clone(),
        })
    }

    /// Verifies a token and returns its `sub`.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`] saying what is wrong with the token.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        self.verify_claims(token).map(|claims| claims.sub)
    }

    /// True when `claims` carry the admin role in the configured claim.
    pub fn is_admin(&self, claims: &Claims) -> bool {
        match claims.other.get(&self.role_claim) {
            Some(serde_json::Value::String(role)) => role == ADMIN_ROLE,
            Some(serde_json::Value::Array(roles)) => {
                roles.iter().any(|r| r.as_str() == Some(ADMIN_ROLE))
            }
            _ => false,
        }
    }

    /// Verifies a token and returns its claims.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`] saying what is wrong with the token.
    pub fn verify_claims(&self, token: &str) -> Result<Claims, ApiError> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            // Identity providers issue e-mail addresses and `provider|id`
            // subs: any non-empty one is the user id, verbatim. Where an id
            // must name a subject or a KV key, `bus::subject::user_key` maps it.
            Ok(data) if !data.claims.sub.is_empty() => Ok(data.claims),
            Ok(_) => Err(unauthorized("invalid_token", "the token's sub is empty")),
            Err(error) => Err(match error.kind() {
                ErrorKind::ExpiredSignature => {
                    unauthorized("token_expired", "the token has expired")
                }
                ErrorKind::InvalidSignature => {
                    unauthorized("invalid_token", "the token's signature does not verify")
                }
                ErrorKind::InvalidAlgorithm => unauthorized(
                    "invalid_token",
                    "the token is signed with an algorithm this gateway does not accept",
                ),
                ErrorKind::MissingRequiredClaim(claim) => {
                    unauthorized("invalid_token", format!("the token has no {claim} claim"))
                }
                ErrorKind::InvalidAudience => {
                    unauthorized("invalid_token", "the token's aud is not accepted")
                }
                ErrorKind::InvalidIssuer => {
                    unauthorized("invalid_token", "the token's iss is not accepted")
                }
                ErrorKind::ImmatureSignature => {
                    unauthorized("invalid_token", "the token is not valid yet")
                }
                _ => unauthorized("invalid_token", "the token is malformed"),
            }),
        }
    }

    /// Mints a dev token, when dev login is enabled.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] when dev login is off.
    pub fn issue(&self, user_id: &str, ttl_seconds: u64) -> Result<String, ApiError> {
        let key = self
            .issuer
            .as_ref()
            .ok_or_else(|| ApiError::NotFound("dev login is not enabled".into()))?;
        let now = chrono::Utc::now().timestamp() as u64;
        let claims = Claims {
            sub: user_id.to_owned(),
            exp: now + ttl_seconds,
            iat: Some(now),
            other: serde_json::Map::new(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|e| ApiError::Internal(e.into()))
    }

    /// True when dev login is enabled.
    pub fn dev_login(&self) -> bool {
        self.issuer.is_some()
    }
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Unauthorized {
        code,
        message: message.into(),
    }
}

fn bearer(parts: &Parts) -> Option<Result<&str, ApiError>> {
    let header = parts.headers.get(axum::http::header::AUTHORIZATION)?;
    Some(
        header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                unauthorized(
                    "invalid_token",
                    "the Authorization header is not `Bearer <token>`",
                )
            }),
    )
}

fn query_token(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "access_token").then(|| v.to_owned())
    })
}

impl<S: Send + Sync> FromRequestParts<S> for User
where
    Arc<Authenticator>: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth: Arc<Authenticator> = axum::extract::FromRef::from_ref(state);
        match bearer(parts) {
            Some(token) => Ok(Self(auth.verify(token?)?)),
            None => Err(unauthorized(
                "missing_token",
                "send Authorization: Bearer <token>",
            )),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin
where
    Arc<Authenticator>: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth: Arc<Authenticator> = axum::extract::FromRef::from_ref(state);
        let Some(token) = bearer(parts) else {
            return Err(unauthorized(
                "missing_token",
                "send Authorization: Bearer <token>",
            ));
        };
        let claims = auth.verify_claims(token?)?;
        if !auth.is_admin(&claims) {
            return Err(ApiError::Forbidden(
                "changing the character catalogue needs the admin role".into(),
            ));
        }
        Ok(Self(claims.sub))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for StreamUser
where
    Arc<Authenticator>: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth: Arc<Authenticator> = axum::extract::FromRef::from_ref(state);
        match (bearer(parts), query_token(parts)) {
            (Some(token), _) => Ok(Self(auth.verify(token?)?)),
            (None, Some(token)) => Ok(Self(auth.verify(&token)?)),
            (None, None) => Err(unauthorized(
                "missing_token",
                "send Authorization: Bearer <token> or ?access_token=<token>",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa.pem");
    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/rsa.pub");
    const EC_PRIVATE: &str = include_str!("../tests/fixtures/ec.pem");
    const EC_PUBLIC: &str = include_str!("../tests/fixtures/ec.pub");

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["gateway"];
        all.extend_from_slice(args);
        Config::parse_from(all)
    }

    fn claims(sub: &str) -> serde_json::Value {
        json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 600})
    }

    fn code(result: Result<String, ApiError>) -> &'static str {
        match result {
            Err(ApiError::Unauthorized { code, .. }) => code,
            other => panic!("expected 401, got {other:?}"),
        }
    }

    #[test]
    fn rs256_tokens_verify_and_hs256_signed_with_the_public_key_is_refused() {
        let auth = Authenticator::build(&config(&["--auth-jwt-public-key", RSA_PUBLIC])).unwrap();
        let good = encode(
            &Header::new(Algorithm::RS256),
            &claims("alice"),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(auth.verify(&good).unwrap(), "alice");
        // The classic confusion attack: the public key used as an HMAC secret.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims("mallory"),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        )
        .unwrap();
        assert_eq!(code(auth.verify(&confused)), "invalid_token");
    }

    #[test]
    fn es256_is_detected_from_the_key_and_pinning_a_mismatch_fails_at_startup() {
        let auth = Authenticator::build(&config(&["--auth-jwt-public-key", EC_PUBLIC])).unwrap();
        let good = encode(
            &Header::new(Algorithm::ES256),
            &claims("bob"),
            &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(auth.verify(&good).unwrap(), "bob");
        let error = Authenticator::build(&config(&[
            "--auth-jwt-public-key",
            EC_PUBLIC,
            "--auth-jwt-algorithm",
            "RS256",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("does not fit"), "{error}");
    }

    #[test]
    fn audience_and_issuer_are_checked_only_when_configured() {
        let secret = "0123456789abcdef0123456789abcdef";
        let key = EncodingKey::from_secret(secret.as_bytes());
        let token = |aud: &str| {
            let mut c = claims("carol");
            c["aud"] = json!(aud);
            c["iss"] = json!("us");
            encode(&Header::default(), &c, &key).unwrap()
        };
        let open = Authenticator::build(&config(&["--auth-jwt-secret", secret])).unwrap();
        assert_eq!(open.verify(&token("anything")).unwrap(), "carol");
        let strict = Authenticator::build(&config(&[
            "--auth-jwt-secret",
            secret,
            "--auth-jwt-audience",
            "app",
            "--auth-jwt-issuer",
            "us",
        ]))
        .unwrap();
        assert_eq!(strict.verify(&token("app")).unwrap(), "carol");
        assert_eq!(code(strict.verify(&token("other"))), "invalid_token");
        let no_exp = encode(&Header::default(), &json!({"sub": "carol"}), &key).unwrap();
        assert_eq!(code(open.verify(&no_exp)), "invalid_token");
    }

    #[test]
    fn any_non_empty_sub_is_the_user_id_verbatim() {
        let secret = "0123456789abcdef0123456789abcdef";
        let key = EncodingKey::from_secret(secret.as_bytes());
        let auth = Authenticator::build(&config(&["--auth-jwt-secret", secret])).unwrap();
        // What identity providers issue: e-mail addresses, `provider|id`,
        // dots, spaces and non-ASCII. None of them names a subject itself.
        for sub in [
            "auth0|alice@example.com",
            "alice.smith@example.co.kr",
            "google-oauth2|1234.5678",
            "a*b>c d",
            "김민지",
        ] {
            let token = encode(&Header::default(), &claims(sub), &key).unwrap();
            assert_eq!(auth.verify(&token).unwrap(), sub);
        }
        let empty = encode(&Header::default(), &claims(""), &key).unwrap();
        assert_eq!(code(auth.verify(&empty)), "invalid_token");
    }

    /// Runs `f` with a subscriber that captures its log lines.
    fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let value = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        (value, text)
    }

    #[test]
    fn a_short_secret_is_used_as_given_with_a_warning_and_an_empty_one_is_refused() {
        let secret = "tiny-k3y";
        let (auth, logs) =
            logs_of(|| Authenticator::build(&config(&["--auth-jwt-secret", secret])));
        let auth = auth.expect("a short secret is accepted");
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("AUTH_JWT_SECRET"), "{logs}");
        assert!(
            !logs.contains(secret),
            "the secret itself is never logged: {logs}"
        );
        // Its bytes as given are the key: a token signed with them verifies.
        let key = EncodingKey::from_secret(secret.as_bytes());
        let token = encode(&Header::default(), &claims("dana"), &key).unwrap();
        assert_eq!(auth.verify(&token).unwrap(), "dana");
        let (_, logs) = logs_of(|| {
            Authenticator::build(&config(&[
                "--auth-jwt-secret",
                "0123456789abcdef0123456789abcdef",
            ]))
        });
        assert!(!logs.contains("WARN"), "{logs}");
        let empty = Authenticator::build(&config(&["--auth-jwt-secret", ""])).unwrap_err();
        assert!(empty.to_string().contains("AUTH_JWT_SECRET"), "{empty}");
    }

    #[test]
    fn dev_login_without_a_secret_is_refused() {
        let error = Authenticator::build(&config(&[
            "--auth-jwt-public-key",
            RSA_PUBLIC,
            "--dev-login",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("AUTH_JWT_SECRET"));
    }
}
