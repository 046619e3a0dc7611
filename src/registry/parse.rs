//! Reads the CMA's delivery token list (`GET /v3/stacks/delivery_tokens`, and
//! the same shape in a `tokens_file`) into [`Token`]s.
//!
//! Values are hashed as they are read and dropped; errors describe where the
//! document went wrong (line and column) but never quote it, since any string
//! in it may be a token.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;

use super::model::{Digest, Environment, Scope, Token, TokenUsage};

/// Why a token list was refused. Never contains document text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON at all.
    #[error("invalid JSON at line {line} column {column}")]
    Syntax { line: usize, column: usize },
    /// JSON, but not the token list shape.
    #[error("unexpected shape at line {line} column {column}")]
    Shape { line: usize, column: usize },
    /// The shape is right but a token is unusable.
    #[error("token #{index}: {problem}")]
    Token { index: usize, problem: &'static str },
}

/// One page (or file) of the token list.
#[derive(Debug)]
pub struct TokenPage {
    pub tokens: Vec<Token>,
    /// `count` when the CMA sent it (`include_count=true`).
    pub count: Option<u64>,
}

#[derive(Deserialize)]
struct ListDoc {
    tokens: Vec<CmaToken>,
    #[serde(default)]
    count: Option<u64>,
}

// No `Debug`: it holds token values.
#[derive(Deserialize)]
struct CmaToken {
    uid: String,
    #[serde(default)]
    name: String,
    token: String,
    #[serde(default)]
    preview_token: Option<String>,
    #[serde(default)]
    scope: Vec<ScopeModule>,
}

#[derive(Deserialize)]
struct ScopeModule {
    module: String,
    #[serde(default)]
    environments: Vec<EnvRef>,
    #[serde(default)]
    branches: Option<Vec<String>>,
    #[serde(default)]
    branch_aliases: Option<Vec<String>>,
}

/// GET answers hold environment objects; create requests hold names.
#[derive(Deserialize)]
#[serde(untagged)]
enum EnvRef {
    Object { name: String, uid: String },
    Name(String),
}

/// Parses a token list document.
pub fn parse_token_list(body: &[u8]) -> Result<TokenPage, ParseError> {
    let doc: ListDoc = serde_json::from_slice(body).map_err(|err| {
        let (line, column) = (err.line(), err.column());
        match err.classify() {
            serde_json::error::Category::Data => ParseError::Shape { line, column },
            _ => ParseError::Syntax { line, column },
        }
    })?;
    let mut seen = HashSet::with_capacity(doc.tokens.len());
    let mut tokens = Vec::with_capacity(doc.tokens.len());
    for (index, raw) in doc.tokens.into_iter().enumerate() {
        let problem = |problem| ParseError::Token { index, problem };
        if raw.uid.trim().is_empty() {
            return Err(problem("empty uid"));
        }
        if raw.token.is_empty() {
            return Err(problem("empty token"));
        }
        if !seen.insert(raw.uid.clone()) {
            continue;
        }
        tokens.push(convert(raw));
    }
    Ok(TokenPage {
        tokens,
        count: doc.count,
    })
}

fn convert(raw: CmaToken) -> Token {
    let mut scope = Scope::default();
    for module in raw.scope {
        match module.module.as_str() {
            "environment" => scope
                .environments
                .extend(module.environments.into_iter().map(|env| match env {
                    EnvRef::Object { name, uid } => Environment { name, uid },
                    EnvRef::Name(name) => Environment {
                        uid: name.clone(),
                        name,
                    },
                })),
            "branch" => scope
                .branches
                .get_or_insert_with(Vec::new)
                .extend(module.branches.unwrap_or_default()),
            "branch_alias" => scope
                .aliases
                .get_or_insert_with(Vec::new)
                .extend(module.branch_aliases.unwrap_or_default()),
            _ => {}
        }
    }
    scope.environments.sort();
    scope.environments.dedup();
    for list in [&mut scope.branches, &mut scope.aliases]
        .into_iter()
        .flatten()
    {
        list.sort();
        list.dedup();
    }
    Token {
        uid: Arc::from(raw.uid),
        name: raw.name,
        scope: Arc::new(scope),
        delivery: Digest::of(raw.token.as_bytes()),
        preview: raw
            .preview_token
            .filter(|p| !p.is_empty())
            .map(|p| Digest::of(p.as_bytes())),
        usage: TokenUsage::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/cma_get_all_delivery_tokens.json");

    #[test]
    fn reads_the_real_cma_shape() {
        let page = parse_token_list(FIXTURE.as_bytes()).unwrap();
        assert_eq!(page.tokens.len(), 1);
        let token = &page.tokens[0];
        assert_eq!(&*token.uid, "bltdce123123d321f3");
        assert_eq!(token.name, "Test");
        assert_eq!(token.delivery, Digest::of(b"csf72faf222222e222ddd2222b"));
        assert_eq!(token.preview, None);
        assert!(token.scope.allows_environment("production"));
        assert!(token.scope.allows_environment("bltc123123ab6c32126"));
        assert!(!token.scope.allows_environment("staging"));
        assert!(token.scope.allows_branch("development"));
        assert!(token.scope.allows_branch("deploy"));
        assert!(!token.scope.allows_branch("feature"));
    }

    #[test]
    fn reads_preview_tokens_and_environment_names() {
        let doc = r#"{"tokens":[{"uid":"u1","name":"n","token":"cs1","preview_token":"cs2",
            "scope":[{"module":"environment","environments":["staging"]}]}],"count":1}"#;
        let page = parse_token_list(doc.as_bytes()).unwrap();
        assert_eq!(page.count, Some(1));
        assert_eq!(page.tokens[0].preview, Some(Digest::of(b"cs2")));
        assert!(page.tokens[0].scope.allows_environment("staging"));
        assert!(page.tokens[0].scope.allows_branch("main"));
    }

    #[test]
    fn errors_never_quote_the_document() {
        let secret = "cs_this_is_a_secret_value";
        let docs = [
            format!(r#"{{"tokens":[{{"uid":"u","token":"{secret}","scope":"{secret}"}}]}}"#),
            format!(r#"{{"tokens":[{{"uid":"u","token":"{secret}""#),
            format!(r#"{{"tokens":{{"{secret}":1}}}}"#),
            format!(r#"{{"tokens":[{{"uid":"u","token":["{secret}"]}}]}}"#),
        ];
        for doc in docs {
            let err = parse_token_list(doc.as_bytes()).unwrap_err();
            assert!(!err.to_string().contains(secret), "{err}");
        }
    }

    #[test]
    fn refuses_wrong_shapes() {
        for doc in [
            "",
            "[]",
            r#"{"tokens":{"uid":1}}"#,
            r#"{"token":[]}"#,
            r#"{"tokens":[{"uid":"","token":"x"}]}"#,
            r#"{"tokens":[{"uid":"u","token":""}]}"#,
            r#"{"tokens":[{"uid":"u"}]}"#,
        ] {
            assert!(parse_token_list(doc.as_bytes()).is_err(), "{doc}");
        }
    }
}
