"""What a registration leaves on disk: ``outputs`` (report.json, fields, Jacobian, warped
images, registration.pt) and ``figures``. Above ``io``; below the CLI."""
