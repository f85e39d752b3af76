"""Everything TF Serving needs or a client uses: server config, client, local predictor."""
