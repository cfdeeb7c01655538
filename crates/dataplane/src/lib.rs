//! Dataplane backends: each translates svcplane's desired state into the kernel.
