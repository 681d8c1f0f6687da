"""Building the model: from a hub id, a local folder or a tiny config; its layer map; what trains."""
