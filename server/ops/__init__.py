"""Operations: health probes and `/metrics`, admin endpoints, the browser chat page."""
