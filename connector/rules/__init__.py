"""Rules shared by several pipelines: strict JSON, dates, delivery outcomes and retries,
failure reasons. Pure, or close to it."""
