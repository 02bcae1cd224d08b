"""fetcher: downloads images safely, identifies and prepares them for analysis."""
