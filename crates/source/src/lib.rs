//! Object sources: where svcplane learns about Services and endpoints.
