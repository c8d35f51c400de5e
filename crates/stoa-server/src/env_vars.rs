//! Secrets as the runs API calls them: `environment-variables` (spec §3.13). Values
//! are encrypted at rest and never returned by any endpoint; every success is a 200.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stoa_core::FieldErrors;
use stoa_core::validate::is_env_name;
use stoa_store::Secret;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// A secret as listed: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvVarInfo {
    pub id: String,
    pub name: String,
    /// Alias of `name`, as the docs call it.
    pub key: String,
    pub is_secret: bool,
    pub created_at: String,
    pub updated_at: String,
}

/// Reply of list and upsert.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvVarList {
    pub environment_variables: Vec<EnvVarInfo>,
}

/// Reply of the deletes.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvVarDeleted {
    pub message: String,
    pub deleted: u64,
}

/// One item of an upsert.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvVarInput {
    /// Variable name (`key` is accepted too).
    #[schema(pattern = "^[A-Za-z_][A-Za-z0-9_]*$")]
    pub name: String,
    pub value: String,
    /// Accepted; every variable is stored encrypted and masked.
    #[serde(default)]
    pub is_secret: Option<bool>,
}

/// Body of an upsert: a batch, or a single object.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvVarUpsert {
    pub environment_variables: Vec<EnvVarInput>,
}

fn info(s: &Secret) -> EnvVarInfo {
    EnvVarInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        key: s.name.clone(),
        is_secret: s.is_secret,
        created_at: stoa_core::time::stamp(&s.created_at),
        updated_at: stoa_core::time::stamp(&s.updated_at),
    }
}

/// Validates an upsert body into (name, value, is_secret) items.
fn parse_upsert(
    body: &Value,
    max_value: usize,
) -> Result<Vec<(String, String, bool)>, FieldErrors> {
    let mut errors = FieldErrors::default();
    let (items, base): (Vec<&Value>, String) = match body.get("environment_variables") {
        Some(Value::Array(a)) => (a.iter().collect(), "environment_variables".into()),
        Some(other) => {
            errors.push(
                "environment_variables",
                "list_type",
                "Input should be a valid list",
                Some(other),
            );
            return Err(errors);
        }
        None if body.is_object() => (vec![body], String::new()),
        None => {
            errors.push(
                "",
                "model_attributes_type",
                "Input should be a valid dictionary or object",
                Some(body),
            );
            return Err(errors);
        }
    };
    let mut out: Vec<(String, String, bool)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = |f: &str| {
            if base.is_empty() {
                f.to_string()
            } else {
                format!("{base}.{i}.{f}")
            }
        };
        let name = item
            .get("name")
            .or_else(|| item.get("key"))
            .and_then(Value::as_str);
        let value = item.get("value").and_then(Value::as_str);
        match name {
            None => errors.push(&at("name"), "missing", "Field required", None),
            Some(n) if !is_env_name(n) => errors.push(
                &at("name"),
                "string_pattern_mismatch",
                "a name starts with a letter or '_', followed by letters, digits or '_'",
                Some(&Value::String(n.into())),
            ),
            Some(n) if out.iter().any(|(o, _, _)| o == n) => errors.push(
                &at("name"),
                "duplicate",
                format!("'{n}' appears more than once in this request"),
                Some(&Value::String(n.into())),
            ),
            Some(_) => {}
        }
        match value {
            None => errors.push(&at("value"), "missing", "Field required (a string)", None),
            Some(v) if v.len() > max_value => errors.push(
                &at("value"),
                "too_long",
                format!("a value is at most {max_value} bytes"),
                None,
            ),
            Some(_) => {}
        }
        // Every variable is stored as a secret; a flag that is not a boolean is still
        // a mistake worth saying.
        if let Some(flag) = item.get("is_secret")
            && !(flag.is_boolean() || flag.is_null())
        {
            errors.push(
                &at("is_secret"),
                "bool_type",
                "Input should be a valid boolean",
                Some(flag),
            );
        }
        if let (Some(n), Some(v)) = (name, value) {
            let is_secret = item
                .get("is_secret")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            out.push((n.to_string(), v.to_string(), is_secret));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The org's variables (names only).
#[utoipa::path(get, path = "/api/v2/external/environment-variables/", tag = "secrets",
    responses((status = 200, body = EnvVarList)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<EnvVarList>, ApiError> {
    let secrets = state.store.list_secrets(&caller.org.id).await?;
    Ok(Json(EnvVarList {
        environment_variables: secrets.iter().map(info).collect(),
    }))
}

/// Creates or replaces variables by name.
#[utoipa::path(post, path = "/api/v2/external/environment-variables/", tag = "secrets",
    request_body = EnvVarUpsert,
    responses((status = 200, body = EnvVarList), (status = 422, body = stoa_types::ErrorBody)), security(("bearer" = [])))]
pub async fn upsert(
    State(state): State<AppState>,
    caller: Caller,
    crate::api::Body(body): crate::api::Body,
) -> Result<Json<EnvVarList>, ApiError> {
    let v: Value = crate::api::parse_body(&body)?;
    let items = parse_upsert(&v, state.config.secrets.max_value_bytes)
        .map_err(|e| ApiError::Validation(e.0))?;
    let existing = state.store.list_secrets(&caller.org.id).await?;
    let new_names = items
        .iter()
        .filter(|(n, _, _)| !existing.iter().any(|e| &e.name == n))
        .count();
    if existing.len() + new_names > state.config.secrets.max_per_org {
        return Err(ApiError::BadRequest(format!(
            "an org may hold at most {} variables (secrets.max_per_org)",
            state.config.secrets.max_per_org
        )));
    }
    let sealed = items
        .into_iter()
        .map(|(n, v, s)| (n, state.keyring.seal(v.as_bytes()), s))
        .collect();
    let stored = state.store.upsert_secrets(&caller.org.id, sealed).await?;
    Ok(Json(EnvVarList {
        environment_variables: stored.iter().map(info).collect(),
    }))
}

/// Deletes every variable of the org.
#[utoipa::path(delete, path = "/api/v2/external/environment-variables/", tag = "secrets",
    responses((status = 200, body = EnvVarDeleted)), security(("bearer" = [])))]
pub async fn delete_all(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<EnvVarDeleted>, ApiError> {
    let n = state.store.delete_all_secrets(&caller.org.id).await?;
    Ok(Json(EnvVarDeleted {
        message: format!("Deleted {n} environment variables"),
        deleted: n,
    }))
}

/// Deletes one variable by id (or name).
#[utoipa::path(delete, path = "/api/v2/external/environment-variables/{id}", tag = "secrets",
    params(("id" = String, Path)),
    responses((status = 200, body = EnvVarDeleted), (status = 404, body = stoa_types::ErrorBody)), security(("bearer" = [])))]
pub async fn delete_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EnvVarDeleted>, ApiError> {
    if !state.store.delete_secret(&caller.org.id, &id).await? {
        return Err(ApiError::NotFound("Environment variable not found".into()));
    }
    Ok(Json(EnvVarDeleted {
        message: "Environment variable deleted".into(),
        deleted: 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn batch_single_and_errors() {
        let ok = parse_upsert(&json!({"environment_variables": [{"name": "A", "value": "1"}, {"key": "B_2", "value": "x"}]}), 100).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(
            parse_upsert(&json!({"key": "C", "value": "3"}), 100).unwrap()[0].0,
            "C"
        );
        let e = parse_upsert(&json!({"environment_variables": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}, {"name": "9x", "value": "3"}]}), 100).unwrap_err();
        let locs: Vec<String> = e.0.iter().map(|x| x.loc.join(".")).collect();
        assert_eq!(
            locs,
            vec![
                "body.environment_variables.1.name",
                "body.environment_variables.2.name"
            ]
        );
    }
}
