"""The web UI: a small HTTP server (stdlib) with a JSON API over the tracking store, and a
vanilla-JS front end (orchestrator/ui/static) that draws its own charts on canvas."""
