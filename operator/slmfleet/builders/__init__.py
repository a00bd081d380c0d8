"""Pure: the desired Deployment, Service, HTTPRoute and labels for a model revision."""
