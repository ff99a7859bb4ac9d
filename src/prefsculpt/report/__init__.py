"""Human-readable outputs: the HTML concept report and plots."""
