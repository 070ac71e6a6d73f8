//! The OpenAPI document, generated from the handlers and the API types (`/openapi.json`),
//! and served with Swagger UI at `/docs` from assets vendored in the binary (no download).

use super::{api, catalogue, errors, health, rebuild, search};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "imageindex query service",
        description = "Search a catalogue by photo: near-duplicates, crops, rotated, rescaled and recompressed copies. \
                       With --auth-file, send `Authorization: Bearer <token>`: read tokens may search and read, admin tokens may also rebuild."
    ),
    paths(
        search::search,
        catalogue::image,
        catalogue::index,
        rebuild::start,
        rebuild::status,
        health::healthz,
        health::readyz,
        health::metrics,
    ),
    components(schemas(
        api::SearchResponse,
        api::MatchOut,
        api::TimingsOut,
        api::QueryImage,
        api::Warning,
        api::SearchUpload,
        api::ImageInfo,
        api::IndexInfo,
        api::PresetInfo,
        api::FailedImage,
        api::ServingInfo,
        api::RebuildRequest,
        api::RebuildStatus,
        api::RebuildProgressOut,
        api::Health,
        api::Readiness,
        errors::ErrorBody,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "search", description = "Find the catalogue images a photo shows"),
        (name = "catalogue", description = "What the served index holds"),
        (name = "index", description = "Rebuilding the index"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in [
            "/v1/search",
            "/v1/images/{id}",
            "/v1/index",
            "/v1/index/rebuild",
            "/v1/index/rebuild/{id}",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let search = &doc["paths"]["/v1/search"]["post"];
        assert!(search["requestBody"]["content"]["multipart/form-data"].is_object());
        assert!(search["responses"]["413"].is_object());
    }
}
