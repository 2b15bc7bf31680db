//! API tokens: made (the answer shows the secret once), listed, revoked.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::StatusCode;
use devbox_engine::{Caller, Engine};
use devbox_wire::{CreateTokenRequest, CreatedToken, TokenInfo};

use crate::server::{ApiError, Body};

pub(crate) async fn list(State(e): State<Arc<Engine>>) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(e.tokens().await?))
}

pub(crate) async fn create(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(e.create_token(&caller, req).await?),
    ))
}

pub(crate) async fn revoke(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    e.revoke_token(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
