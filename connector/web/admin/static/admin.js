// Conveniences only: the page works without this file.
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  var field = document.getElementById(button.dataset.copy);
  button.hidden = false;
  button.addEventListener("click", function () {
    field.select();
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () {
        document.execCommand("copy");
        done();
      });
    } else {
      document.execCommand("copy");
      done();
    }
  });
});
document.querySelectorAll("#rotate-webhook-url").forEach(function (button) {
  button.addEventListener("click", function (event) {
    if (!window.confirm("Make a new webhook URL? The current one stops working at once.")) {
      event.preventDefault();
    }
  });
});
