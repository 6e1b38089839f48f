"""Dashboards for monitoring: Grafana definitions and the static drift page."""
