-- Models, their numbered versions, aliases, and the content-addressed files the versions use.

CREATE TABLE registry.models (
    name text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The number the next upload gets; only ever incremented, so numbers are never reused.
    next_version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

-- One row per stored file; the file lives at <blob_dir>/<sha256[:2]>/<sha256>.
CREATE TABLE registry.blobs (
    sha256 text PRIMARY KEY,
    size_bytes bigint NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registry.versions (
    model text NOT NULL REFERENCES registry.models (name) ON DELETE CASCADE,
    version bigint NOT NULL CHECK (version > 0),
    state text NOT NULL CHECK (state IN ('READY', 'ARCHIVED')),
    sha256 text NOT NULL REFERENCES registry.blobs (sha256),
    size_bytes bigint NOT NULL,
    signature jsonb NOT NULL,
    onnx jsonb NOT NULL,
    description text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}'::jsonb,
    version_label text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

CREATE INDEX versions_sha256 ON registry.versions (sha256);
CREATE INDEX versions_ready ON registry.versions (model, version DESC) WHERE state = 'READY';

CREATE TABLE registry.aliases (
    model text NOT NULL REFERENCES registry.models (name) ON DELETE CASCADE,
    alias text NOT NULL,
    version bigint NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, alias),
    -- A version cannot be deleted while an alias points at it.
    FOREIGN KEY (model, version) REFERENCES registry.versions (model, version)
);

CREATE INDEX aliases_target ON registry.aliases (model, version);
