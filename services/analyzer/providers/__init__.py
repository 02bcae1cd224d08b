"""The analyzer's providers, one package each (``local``, ``gemini``...), beside ``base``: the
interface they implement and what they share."""
