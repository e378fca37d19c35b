"""The student as a Ray Serve application (docs/serving.md): ``app`` the deployment, ``parse``
the request, ``encode`` the response, ``run`` starting and stopping it."""
