"""The data layer: the endpoint datastore and what feeds it (endpoints-file discovery, the metrics
scraper, the KV-event subscriber), with the supervisor that runs those long-lived tasks."""
